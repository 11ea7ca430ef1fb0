/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The maps of the TC-ingress program, in one place.  Each one plays a part
 * of the NIC; the controller pins them under /sys/fs/bpf/ctctl/<box>/.
 */
#ifndef CTCTL_MAPS_H
#define CTCTL_MAPS_H

#include "ctctl_abi.h"

/* Punts to software: the metadata header followed by the packet. */
BPF_PERF_OUTPUT(punts);

/* Per-CPU counters, indexed by enum ctctl_reason then enum ctctl_counter. */
BPF_PERCPU_ARRAY(counters, __u64, CTCTL_C_MAX);

#endif /* CTCTL_MAPS_H */
