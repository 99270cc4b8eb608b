/* Flow telemetry from sockops: one record per socket of a meshed pod, keyed by cookie.
 * RTT and retransmit callbacks fire per ACK; writes are rate-limited to one per
 * WEFT_FLOW_SAMPLE_NS per flow, and the close callback writes the final values. */
#ifndef WEFT_FLOW_H
#define WEFT_FLOW_H

#include "drop.h"

/* A socket's own 4-tuple; IPv4 and IPv4-mapped IPv6 only. */
static __always_inline int weft_sock_key_of(struct bpf_sock_ops *skops, struct weft_sock_key *key)
{
	__u32 remote_port = skops->remote_port;

	if (skops->family == AF_INET6) {
		if (skops->remote_ip6[0] || skops->remote_ip6[1] ||
		    skops->remote_ip6[2] != bpf_htonl(0x0000ffff))
			return -EAFNOSUPPORT;
	} else if (skops->family != AF_INET) {
		return -EAFNOSUPPORT;
	}
	key->local_ip = skops->local_ip4;
	key->remote_ip = skops->remote_ip4;
	key->local_port = (__u16)skops->local_port;
	/* remote_port is network order; kernels shift it into the upper 16 bits. */
	key->remote_port = remote_port > 0xffff ? (__u16)bpf_ntohl(remote_port)
						: bpf_ntohs((__u16)remote_port);
	return 0;
}

static __always_inline void weft_flow_open(struct bpf_sock_ops *skops,
					   const struct weft_sock_key *key, __u64 cookie,
					   __u64 cgroup_id, __u8 direction,
					   const struct weft_origdst *orig, __u8 flags)
{
	struct weft_flow flow = {};
	__u64 now = bpf_ktime_get_ns();

	flow.cgroup_id = cgroup_id;
	flow.start_ns = now;
	flow.sampled_ns = now;
	flow.local_ip = key->local_ip;
	flow.remote_ip = key->remote_ip;
	flow.local_port = key->local_port;
	flow.remote_port = key->remote_port;
	flow.orig_ip = orig->ip;
	flow.orig_port = orig->port;
	flow.direction = direction;
	flow.flags = flags;
	flow.srtt_us = skops->srtt_us >> 3; /* the kernel keeps srtt << 3 */
	flow.total_retrans = skops->total_retrans;
	weft_flows_v1.update(&cookie, &flow);
	weft_count(WEFT_CTR_FLOWS_OPENED, 1);
}

static __always_inline struct weft_flow *weft_flow_sample(struct bpf_sock_ops *skops, int final)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct weft_flow *flow = weft_flows_v1.lookup(&cookie);
	__u64 now;

	if (!flow)
		return 0;
	now = bpf_ktime_get_ns();
	if (!final && now - flow->sampled_ns < WEFT_FLOW_SAMPLE_NS)
		return flow;
	flow->sampled_ns = now;
	flow->bytes_acked = skops->bytes_acked;
	flow->bytes_received = skops->bytes_received;
	flow->srtt_us = skops->srtt_us >> 3;
	flow->total_retrans = skops->total_retrans;
	return flow;
}

static __always_inline void weft_flow_close(struct bpf_sock_ops *skops)
{
	struct weft_flow *flow = weft_flow_sample(skops, 1);
	struct weft_fastpath_sock *fast;
	struct weft_sock_key key;

	if (!flow)
		return;
	flow->end_ns = flow->sampled_ns;
	flow->flags |= WEFT_FLOW_CLOSED;
	if (weft_sock_key_of(skops, &key) == 0) {
		fast = weft_fastpath_state_v1.lookup(&key);
		if (fast) {
			flow->fastpath_bytes = fast->bytes;
			weft_fastpath_state_v1.delete(&key);
		}
	}
	weft_count(WEFT_CTR_FLOWS_CLOSED, 1);
}

#endif /* WEFT_FLOW_H */
