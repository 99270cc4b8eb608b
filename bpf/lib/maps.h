/* Every map of the data path. The agent creates them from what bcc reports, pins them under
 * its pin root (one set per agent) and reuses the pins after a restart. Names carry a
 * layout version: change a key or value and bump it, so an old pin is never misread.
 */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#include "common.h"
#include "counters.h"

/* Node settings written by the agent: tunnel address and ports, global switches. */
BPF_TABLE("array", __u32, struct weft_node_config, weft_node_v1, 1);

/* Meshed pods by cgroup id: address and mode flags. */
BPF_TABLE("hash", __u64, struct weft_pod_config, weft_pods_v1, WEFT_PODS_MAX);

/* Meshed pods by address -> cgroup id, for hooks that run in softirq (no "current"). */
BPF_TABLE("hash", __be32, __u64, weft_pod_ips_v1, WEFT_PODS_MAX);

/* Per-pod (or, with cgroup id 0, global) inbound exception and excluded outbound ports. */
BPF_TABLE("hash", struct weft_port_key, __u8, weft_pod_ports_v1, WEFT_PORTS_MAX);

/* Excluded outbound CIDRs per pod and (cgroup id 0) global; longest prefix wins. */
BPF_F_TABLE("lpm_trie", struct weft_cidr_key, __u8, weft_excluded_cidrs_v1, WEFT_CIDRS_MAX,
	    BPF_F_NO_PREALLOC);

/* Original destinations by socket cookie, from connect4 until sockops re-keys them. */
BPF_TABLE("lru_hash", __u64, struct weft_origdst, weft_origdst_cookie_v1, WEFT_ORIGDST_MAX);

/* Original destinations by the pod's (ip, port): what the tunnel sees as its peer. */
BPF_TABLE("lru_hash", struct weft_endpoint, struct weft_origdst, weft_origdst_v1,
	  WEFT_ORIGDST_MAX);

/* Same-node pairs L4 policy allows to be spliced: (src pod ip, dst pod ip, dst port). */
BPF_TABLE("hash", struct weft_pair_key, __u8, weft_fastpath_pairs_v1, WEFT_PAIRS_MAX);

/* The node tunnel's outbound listener (key 0): weft_tunnel_lookup steers captured connects
 * to it and to nothing else. The kernel removes the entry when the socket closes. 8-byte
 * values: user space reads an entry back as the socket's cookie (is one registered?). */
BPF_TABLE("sockmap", __u32, __u64, weft_tunnel_listeners_v1, 1);

/* Spliced sockets by their own 4-tuple; sk_msg redirects each send to the peer's entry. */
BPF_SOCKHASH(weft_fastpath_socks_v1, struct weft_sock_key, WEFT_FASTPATH_SOCKS_MAX);

/* Per spliced socket: cookie, bytes and sends through the fast path, TCP-only fallback. */
BPF_TABLE("lru_hash", struct weft_sock_key, struct weft_fastpath_sock, weft_fastpath_state_v1,
	  WEFT_FASTPATH_SOCKS_MAX);

/* Connections the node tunnel opened to local pods, by the pod's view of their 4-tuple
 * (local = the pod): written by weft_tunnel_egress as the tunnel's SYN leaves, read by
 * weft_inbound, so a STRICT pod admits the tunnel's own sockets, not any process that
 * uses the node's address. */
BPF_TABLE("lru_hash", struct weft_sock_key, __u8, weft_tunnel_syns_v1, WEFT_ORIGDST_MAX);

/* Flow telemetry by socket cookie: tuple, bytes, RTT, retransmits, start and end. */
BPF_TABLE("lru_hash", __u64, struct weft_flow, weft_flows_v1, WEFT_FLOWS_MAX);

/* Event counters (enum weft_counter), per CPU so hot paths never share a cache line. */
BPF_TABLE("percpu_array", __u32, __u64, weft_counters_v1, WEFT_CTR_MAX);

/* Dropped packets by (cgroup id, reason). */
BPF_TABLE("hash", struct weft_drop_key, __u64, weft_drops_v1, WEFT_PODS_MAX * 4);

/* Attachment registry, written only by the agent: which cgroups it attached to, so a new
 * agent process can find and detach stale attachments. No program reads it. */
BPF_F_TABLE("hash", __u64, struct weft_attachment, weft_attachments_v1, WEFT_PODS_MAX,
	    BPF_F_NO_PREALLOC);

#endif /* WEFT_MAPS_H */
