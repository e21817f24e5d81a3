"""Snapshots: saving VMs and their records (``service``), what a new VM starts
from (``restore``), imports of OCI images (``oci_import``), collecting and
flattening (``housekeeping``), the operator's snapshots for every user
(``system``), the rows they share (``rows``)."""
