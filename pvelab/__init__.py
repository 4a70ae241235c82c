"""pvelab: build, boot-test and publish a Proxmox VE 3-node + QDevice rehearsal lab."""

__version__ = "0.1.0"
