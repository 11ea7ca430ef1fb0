"""One box: the controller that wires the NIC side to the kernel side and
runs the per-packet loop, its control socket and requests, its config and
state files, and the views that turn its data into text."""
