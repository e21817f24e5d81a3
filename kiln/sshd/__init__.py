"""The SSH gateway: ``ssh <vm_id>@<host> -p <port>`` into any VM (kiln/sshd/README.md)."""
