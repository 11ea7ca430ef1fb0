"""The lab around a box: namespaces and veths, real traffic, box processes,
the slide-9 firewall, and the demo."""
