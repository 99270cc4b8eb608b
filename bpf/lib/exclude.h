/* Outbound exclusions: connects that capture leaves alone. */
#ifndef WEFT_EXCLUDE_H
#define WEFT_EXCLUDE_H

#include "pod.h"

static __always_inline int weft_is_loopback(__be32 ip)
{
	return (bpf_ntohl(ip) >> 24) == 127;
}

static __always_inline int weft_cidr_excluded(__u64 cgroup_id, __be32 ip)
{
	struct weft_cidr_key key = {
		.prefixlen = 96,
		.cgroup_lo = (__u32)cgroup_id,
		.cgroup_hi = (__u32)(cgroup_id >> 32),
		.ip = ip,
	};

	if (weft_excluded_cidrs_v1.lookup(&key))
		return 1;
	key.cgroup_lo = 0;
	key.cgroup_hi = 0;
	return weft_excluded_cidrs_v1.lookup(&key) != 0;
}

/* 1 when a pod's connect to dst:port must not be captured. */
static __always_inline int weft_outbound_excluded(struct bpf_sock_addr *ctx,
						  const struct weft_node_config *node,
						  const struct weft_pod_config *pod, __u64 cgroup_id,
						  __be32 dst, __u16 port)
{
	struct bpf_sock *sk = ctx->sk;

	/* The pod talking to itself, or to its node (kubelet, the agent's own ports). */
	if (!dst || weft_is_loopback(dst) || dst == pod->ip || dst == node->tunnel_ip)
		return 1;
	/* DNS over TCP goes to the resolver directly, like DNS over UDP (never captured). */
	if (port == WEFT_DNS_PORT)
		return 1;
	/* The agent's own sockets, should one ever run inside a meshed cgroup. */
	if (node->socket_mark && sk && sk->mark == node->socket_mark)
		return 1;
	if (weft_port_listed(cgroup_id, port, WEFT_PORT_OUTBOUND_EXCLUDED))
		return 1;
	return weft_cidr_excluded(cgroup_id, dst);
}

#endif /* WEFT_EXCLUDE_H */
