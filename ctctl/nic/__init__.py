"""The "NIC" and its driver: the TC-ingress program (bpf/) compiled and
attached by the loader, its tables owned by maps, rules and flow entries
encoded for it by encode, written by the driver within the declared caps;
punts read from it and frames transmitted on its ports."""
