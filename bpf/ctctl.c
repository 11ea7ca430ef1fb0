// SPDX-License-Identifier: GPL-2.0
/*
 * ctctl's "NIC": a TC-ingress program attached to every port of a box.
 *
 * This first version offloads nothing: it parses each packet, counts it,
 * and hands it to software with the reason it stopped (NO_OFFLOAD for a
 * packet it understood, a parse reason otherwise), then drops its own copy.
 * The controller continues the packet and transmits the result.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "ctctl_abi.h"
#include "parse.h"
#include "maps.h"

/*
 * Headers the parsers may need in the linear area: Ethernet + VLAN, an IPv4
 * header with options or IPv6, and a TCP header with options.
 */
#define CTCTL_PULL_LEN (18 + 60 + 60)

static __always_inline void count(__u32 slot, __u64 n)
{
	__u64 *v = counters.lookup(&slot);

	if (v)
		*v += n;	/* per-CPU slot: no other writer */
}

static __always_inline int punt(struct __sk_buff *skb, __u16 reason)
{
	struct ctctl_punt_hdr hdr = {};
	__u64 len = skb->len;
	int err;

	if (len > CTCTL_MAX_PUNT) {
		count(CTCTL_C_TOO_BIG, 1);
		return TC_ACT_SHOT;
	}
	hdr.reason = reason;
	hdr.ifindex = skb->ifindex;
	hdr.pkt_len = len;
	hdr.tstamp_ns = bpf_ktime_get_ns();
	if (skb->vlan_present) {
		hdr.vlan_proto = bpf_ntohs(skb->vlan_proto);
		hdr.vlan_tci = skb->vlan_tci;
	}
	/* BCC rewrites perf_submit_skb into a statement: keep it on its own. */
	err = punts.perf_submit_skb(skb, len, &hdr, sizeof(hdr));
	if (err < 0) {
		/* Buffer full: the packet is lost, and said so. */
		count(CTCTL_C_PERF_LOST, 1);
		return TC_ACT_SHOT;
	}
	count(reason, 1);
	count(CTCTL_C_PUNT, 1);
	return TC_ACT_SHOT;
}

int ctctl_ingress(struct __sk_buff *skb)
{
	struct ctctl_pkt pkt = {};
	struct cursor c;
	__u32 pull = skb->len < CTCTL_PULL_LEN ? skb->len : CTCTL_PULL_LEN;
	int r;

	count(CTCTL_C_RX, 1);
	count(CTCTL_C_RX_BYTES, skb->len);

	/* Non-linear skbs (veth with GRO, for one) may hold headers in frags. */
	if (skb->data_end - skb->data < pull)
		bpf_skb_pull_data(skb, pull);

	c.start = (void *)(long)skb->data;
	c.pos = c.start;
	c.end = (void *)(long)skb->data_end;
	c.len = skb->len;
	c.l3_end = skb->len;
	r = parse_packet(&c, &pkt);
	if (r != CTCTL_R_NONE)
		return punt(skb, r);
	return punt(skb, CTCTL_R_NO_OFFLOAD);
}
