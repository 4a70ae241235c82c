"""The running lab: QEMU guests on an isolated lab network (namespace, bridge, dnsmasq), the driver that owns them, and its faults."""
