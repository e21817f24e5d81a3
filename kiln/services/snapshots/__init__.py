"""Snapshots: saving VMs and their records (``service``), what a new VM starts
from (``restore``), imports of OCI images (``oci_import``), collecting and
flattening (``housekeeping``), the rows they share (``rows``)."""
