"""Disk and boot images: ``node`` (the lab nodes' OS images), ``guest`` (the tiny
test guest: cloud kernel + busybox initramfs, data files in ``guest/``), ``seed``
(cloud-init NoCloud seeds).
"""
