/* Drop reasons: codes shared with user space (agent/datapath/reasons.py, DropReason).
 * Append only. A retired reason keeps its number and is never reused.
 */
#ifndef WEFT_DROP_H
#define WEFT_DROP_H

#include "maps.h"
#include "counters.h"

enum weft_drop_reason {
	WEFT_DROP_NOT_FROM_TUNNEL = 1,   /* STRICT: TCP to a listener from a source that is not the tunnel */
	WEFT_DROP_NODE_UNCONFIGURED = 2, /* STRICT pod but no tunnel address set yet: fail closed */
	WEFT_DROP_MALFORMED = 3,         /* could not read the IPv4 header */
	WEFT_DROP_NOT_TUNNEL_SOCKET = 4, /* STRICT: from the node's address, but not a tunnel socket */
	WEFT_DROP_UDP_NOT_MESHED = 5,    /* STRICT: UDP to an unconnected socket (UDP is not meshed) */
	WEFT_DROP_IPV6_NOT_MESHED = 6,   /* STRICT: native IPv6 to a listener or unconnected socket */
	WEFT_DROP_PROTOCOL_NOT_MESHED = 7, /* STRICT: SCTP or another protocol weft does not mesh */
};

static __always_inline void weft_count(__u32 counter, __u64 n)
{
	__u64 *v = weft_counters_v1.lookup(&counter);

	if (v)
		*v += n; /* per-CPU slot: no atomic needed */
}

/* Count a drop for (cgroup, reason) and return the verdict-ready -EPERM. */
static __always_inline int weft_drop(__u64 cgroup_id, __u32 reason)
{
	struct weft_drop_key key = { .cgroup_id = cgroup_id, .reason = reason };
	__u64 one = 1, *v;

	v = weft_drops_v1.lookup(&key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		weft_drops_v1.update(&key, &one);
	weft_count(WEFT_CTR_INBOUND_DROPS, 1);
	return -EPERM;
}

#endif /* WEFT_DROP_H */
