# pvelab-base defaults (overridable by the caller's environment).
# Named 05-: DIB sources every element's environment.d in one sorted list, and the
# bootloader element's 10-bootloader-default-cmdline sets its own default for
# DIB_BOOTLOADER_DEFAULT_CMDLINE with ${VAR:-...}; ours must come first to count.
export DIB_GRUB_TIMEOUT=${DIB_GRUB_TIMEOUT:-0}
export DIB_APT_MINIMAL_CREATE_INTERFACES=${DIB_APT_MINIMAL_CREATE_INTERFACES:-0}
export DIB_PVELAB_USER=${DIB_PVELAB_USER:-ops}
# unset: sudo; set but empty (the lab file's `groups: []`): no group at all
export DIB_PVELAB_GROUPS=${DIB_PVELAB_GROUPS-sudo}
export DIB_PVELAB_DNS=${DIB_PVELAB_DNS:-"1.1.1.1 8.8.8.8"}
# Quiet kernel on the consoles (systemd still reports each unit): printing every
# kernel line costs seconds under emulation.
export DIB_BOOTLOADER_DEFAULT_CMDLINE=${DIB_BOOTLOADER_DEFAULT_CMDLINE:-"nofb nomodeset gfxpayload=text quiet systemd.show_status=1"}
