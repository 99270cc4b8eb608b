/* Types shared by every header: the map keys and values user space reads and writes.
 * agent/datapath/abi.py mirrors each struct; the loader checks the sizes bcc reports.
 * Addresses are network byte order (__be32), ports host byte order (__u16).
 */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <linux/errno.h>
#include <linux/socket.h>

#define WEFT_DNS_PORT 53

/* weft_node_v1 flags */
#define WEFT_NODE_FASTPATH (1U << 0) /* global switch for the same-node fast path */

/* weft_pods_v1 flags */
#define WEFT_POD_CAPTURE (1U << 0)  /* redirect the pod's outbound TCP to the tunnel */
#define WEFT_POD_STRICT (1U << 1)   /* drop inbound TCP that bypassed the tunnel */
#define WEFT_POD_FASTPATH (1U << 2) /* the pod may be spliced with same-node peers */

/* weft_pod_ports_v1 kinds */
#define WEFT_PORT_INBOUND_EXCEPTION 1 /* STRICT does not apply to this listening port */
#define WEFT_PORT_OUTBOUND_EXCLUDED 2 /* connects to this port are not captured */
#define WEFT_PORT_PROBE 3 /* kubelet probes: STRICT admits plaintext from the node itself */

/* weft_flows_v1 directions and flags */
#define WEFT_FLOW_OUTBOUND 1 /* the pod connected (active open) */
#define WEFT_FLOW_INBOUND 2  /* the pod accepted (passive open) */
#define WEFT_FLOW_REDIRECTED (1U << 0) /* connect4 sent it to the tunnel */
#define WEFT_FLOW_FASTPATH (1U << 1)   /* the socket joined the fast-path sockhash */
#define WEFT_FLOW_CLOSED (1U << 2)     /* final values: the socket reached TCP_CLOSE */

/* weft_attachments_v1 kinds */
#define WEFT_ATTACH_POD 1    /* a meshed pod: connect4/6, sockops, cgroup_skb ingress */
#define WEFT_ATTACH_TUNNEL 2 /* the tunnel's own cgroup: getsockopt (SO_ORIGINAL_DST) */

/* weft_fastpath_state_v1 flags */
#define WEFT_FASTPATH_TCP_ONLY (1U << 0) /* a send found no peer: stay on TCP (ordering) */

struct weft_node_config {
	__be32 tunnel_ip;     /* the node tunnel's address; redirected connects go here */
	__u16 outbound_port;  /* 15001: the tunnel's outbound capture listener */
	__u16 inbound_port;   /* 15008: HBONE; documented here, enforced by STRICT's source check */
	__u32 flags;          /* WEFT_NODE_* */
	__u32 socket_mark;    /* SO_MARK of the agent's own sockets (never captured); 0: none */
};

struct weft_pod_config {
	__be32 ip;
	__u32 flags; /* WEFT_POD_* */
};

struct weft_port_key {
	__u64 cgroup_id; /* 0: every pod */
	__u16 port;
	__u8 kind; /* WEFT_PORT_* */
	__u8 pad[5];
};

/* LPM key: the first 64 bits (the cgroup id) always match whole, then the address prefix. */
struct weft_cidr_key {
	__u32 prefixlen; /* 64 + CIDR prefix length */
	__u32 cgroup_lo; /* cgroup id 0: every pod */
	__u32 cgroup_hi;
	__be32 ip;
};

struct weft_endpoint {
	__be32 ip;
	__u16 port;
	__u16 pad;
};

struct weft_origdst {
	__be32 ip;   /* the destination the pod asked for */
	__u16 port;
	__u16 pad;
	__u64 cgroup_id; /* the pod that connected */
	__u64 cookie;    /* its socket */
};

struct weft_pair_key {
	__be32 src_ip;
	__be32 dst_ip;
	__u16 dst_port;
	__u16 pad;
};

/* A socket seen from its own side; its peer's key is the same with local/remote swapped. */
struct weft_sock_key {
	__be32 local_ip;
	__be32 remote_ip;
	__u16 local_port;
	__u16 remote_port;
};

struct weft_fastpath_sock {
	__u64 cookie;
	__u64 bytes; /* handed to the peer socket by sk_msg */
	__u64 msgs;
	__u32 flags; /* WEFT_FASTPATH_* */
	__u32 pad;
};

struct weft_flow {
	__u64 cgroup_id;
	__u64 start_ns;   /* bpf_ktime_get_ns (CLOCK_MONOTONIC) at establishment */
	__u64 end_ns;     /* at TCP_CLOSE; 0 while open */
	__u64 sampled_ns; /* last write, for the WEFT_FLOW_SAMPLE_NS rate limit */
	__u64 bytes_acked;    /* sent by this socket and acknowledged (TCP path only) */
	__u64 bytes_received; /* received over TCP (the fast path bypasses TCP) */
	__u64 fastpath_bytes; /* sent by this socket through the fast path; set at close */
	__be32 local_ip;
	__be32 remote_ip;
	__be32 orig_ip; /* original destination when redirected, else 0 */
	__u16 local_port;
	__u16 remote_port;
	__u16 orig_port;
	__u8 direction; /* WEFT_FLOW_OUTBOUND / INBOUND */
	__u8 flags;     /* WEFT_FLOW_* */
	__u32 srtt_us;
	__u32 total_retrans;
	__u32 pad;
};

struct weft_drop_key {
	__u64 cgroup_id;
	__u32 reason; /* enum weft_drop_reason */
	__u32 pad;
};

struct weft_attachment {
	__u64 attached_ns;
	__u32 kind; /* WEFT_ATTACH_* */
	__u32 pad;
	char path[WEFT_CGROUP_PATH_MAX]; /* the cgroup directory, NUL-terminated */
};

#endif /* WEFT_COMMON_H */
