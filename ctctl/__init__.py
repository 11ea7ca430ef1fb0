"""ctctl: tc connection tracking with offload, modelled with eBPF and Python."""
