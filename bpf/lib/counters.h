/* Event counters, indexes into weft_counters_v1. Append only: agent/datapath/reasons.py
 * mirrors them (Counter) and a unit test compares the two.
 */
#ifndef WEFT_COUNTERS_H
#define WEFT_COUNTERS_H

enum weft_counter {
	WEFT_CTR_CONNECTS = 0,           /* TCP connects from meshed pods examined by connect4/6 */
	WEFT_CTR_REDIRECTED = 1,         /* rewritten to the tunnel's outbound port */
	WEFT_CTR_EXCLUDED = 2,           /* left alone: loopback, tunnel, DNS, excluded port/CIDR, mark */
	WEFT_CTR_FASTPATH_CONNECTS = 3,  /* left direct because the pair may be spliced */
	WEFT_CTR_ORIGDST_REKEYED = 4,    /* sockops moved a cookie entry to (src ip, src port) */
	WEFT_CTR_FASTPATH_SOCKETS = 5,   /* sockets inserted into the fast-path sockhash */
	WEFT_CTR_FASTPATH_MSGS = 6,      /* sends redirected to the peer socket */
	WEFT_CTR_FASTPATH_BYTES = 7,     /* bytes redirected to the peer socket */
	WEFT_CTR_FASTPATH_FALLBACK = 8,  /* sends that found no peer: the socket stays on TCP */
	WEFT_CTR_FASTPATH_INSERT_ERRORS = 9, /* sockhash insert failed (full?) */
	WEFT_CTR_FLOWS_OPENED = 10,      /* flow records created */
	WEFT_CTR_FLOWS_CLOSED = 11,      /* flow records finalised at TCP_CLOSE */
	WEFT_CTR_IPV6_PASSED = 12,       /* native IPv6 connects not captured (see docs/datapath.md) */
	WEFT_CTR_INBOUND_DROPS = 13,     /* packets dropped by inbound enforcement (all reasons) */
	WEFT_CTR_MAX,
};

#endif /* WEFT_COUNTERS_H */
