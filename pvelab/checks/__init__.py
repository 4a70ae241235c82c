"""The checks on built artefacts: the boot test, the install test, the scenario and the corosync rehearsal."""
