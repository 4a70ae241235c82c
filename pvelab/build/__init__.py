"""Building: lab model -> rendered overlays -> the shared DIB base -> each node's artefacts (qcow2, ISOs, netboot bundle, SBOM)."""
