/* Pod and node configuration lookups. */
#ifndef WEFT_POD_H
#define WEFT_POD_H

#include "maps.h"

static __always_inline struct weft_node_config *weft_node(void)
{
	__u32 zero = 0;

	return weft_node_v1.lookup(&zero);
}

static __always_inline struct weft_pod_config *weft_pod_by_cgroup(__u64 cgroup_id)
{
	return weft_pods_v1.lookup(&cgroup_id);
}

/* In softirq (sockops on an incoming ACK) "current" is whoever was interrupted, so hooks
 * there find the pod by its address instead of bpf_get_current_cgroup_id(). */
static __always_inline struct weft_pod_config *weft_pod_by_ip(__be32 ip, __u64 *cgroup_id)
{
	__u64 *cg = weft_pod_ips_v1.lookup(&ip);

	if (!cg)
		return 0;
	*cgroup_id = *cg;
	return weft_pods_v1.lookup(cg);
}

static __always_inline int weft_port_listed(__u64 cgroup_id, __u16 port, __u8 kind)
{
	struct weft_port_key key = { .cgroup_id = cgroup_id, .port = port, .kind = kind };

	if (weft_pod_ports_v1.lookup(&key))
		return 1;
	key.cgroup_id = 0;
	return weft_pod_ports_v1.lookup(&key) != 0;
}

#endif /* WEFT_POD_H */
