"""A lab network's network boot side: the serving root, dnsmasq's PXE answers, HTTP.

The bytes served are the nodes' bundles and ISOs (:mod:`pvelab.build.netboot` lays out the
root and writes dnsmasq's options); this module runs them on a running lab's network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pvelab.build.netboot import HTTP_PORT, Mode, dnsmasq_options, serve_tree
from pvelab.model.lab import Lab, Node
from pvelab.running.labnet import LabNet

SERVE_DIR = "netboot-root"  # in a boot's work folder: the serving root (links to the ISOs)


class Serving:
    """The network boot side of a lab network (:class:`pvelab.running.labnet.LabNet`): the serving
    root in ``workdir``, dnsmasq's PXE answers, an HTTP server in the namespace.
    ``configure`` before the network is up, ``start`` after, ``stop`` removes the root."""

    def __init__(self, lab: Lab, nodes: tuple[Node, ...], mode: Mode, workdir: Path):
        self.lab, self.nodes, self.mode = lab, nodes, mode
        self.root = workdir / SERVE_DIR
        self.http: HttpServer | None = None

    def configure(self, net: LabNet) -> str:
        serve_tree(self.lab, self.nodes, self.mode, self.root)
        modes = {n.name: self.mode for n in self.nodes}
        net.boot_options = tuple(dnsmasq_options(self.lab, modes, self.root, net.gateway))
        return f"network boot ({self.mode.value}): TFTP + HTTP from {net.gateway}, root {self.root}"

    def start(self, net: LabNet) -> None:
        self.http = HttpServer(net.name, net.gateway, self.root, net.logdir / "http.log")
        self.http.start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        # the root links the ISOs: a rebuild must not find them held here
        shutil.rmtree(self.root, ignore_errors=True)


class HttpServer:
    """A static HTTP server for ``root`` inside network namespace ``ns``, on ``address``:80
    (Python's ``http.server``, threaded; its log beside the root)."""

    def __init__(self, ns: str, address: str, root: Path, log: Path):
        self.args = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "http.server",
            "--bind", address, "--directory", str(root), str(HTTP_PORT),
        ]  # fmt: skip
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                self.args,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
