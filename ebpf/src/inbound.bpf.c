// SPDX-License-Identifier: Apache-2.0
//
// Inbound capture for one pod network namespace: an `sk_lookup` program that hands every new
// TCP connection arriving from outside the pod to the agent's inbound (15006) listener, except
// connections to the HBONE port, which the agent's own 15008 listener receives by the normal
// socket lookup.
//
// sk_lookup runs when the kernel looks up a listening socket for a SYN, after routing has
// decided the packet is local, and it does not rewrite any address: the socket the agent
// accepts keeps the ORIGINAL destination as its local address, so no conntrack and no
// SO_ORIGINAL_DST are needed.
//
// What is never steered:
// - anything that is not TCP over IPv4 or IPv6;
// - connections received on the loopback device to a loopback address, and connections from the
//   pod's own address to itself (for a local destination the kernel reports the device of the
//   address's route, eth0, as `ingress_ifindex`, so "came over lo" is not visible here);
// - connections from a source address:port the agent has exempted (`agent_delivery`): the
//   agent hands each inbound connection to the application from a socket bound to the
//   client's address, and that connection must not be steered back to the agent (a loop).
//   sk_lookup cannot see the socket mark, so the agent names the exact source instead.
// - connections to the HBONE port (configured by the loader);
// - connections from the configured probe source address (the node's kubelet probes), so
//   health checks keep reaching the application directly.
//
// Fail closed: when the agent's listener is missing from the map (the agent restarts, or has
// not registered yet) the connection is refused instead of reaching the application unchecked.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

// The loopback device is created first in every network namespace, so its index is always 1.
#define LOOPBACK_IFINDEX 1

// Key of the agent's inbound listener in `inbound_listener`.
#define INBOUND_LISTENER_KEY 0

// Set by the loader before the program is loaded (`.rodata`, so the verifier sees constants).
// Ports in host byte order (sk_lookup's `local_port` is host order).
volatile const __u32 hbone_port = 15008;
// The probe source address in network byte order; 0 = no probe bypass.
volatile const __u32 probe_source_ip4 = 0;

// Key of `agent_delivery`: the source of a connection the agent opens towards the application.
struct delivery_key {
	__u32 ip4;  // network order
	__u16 port; // network order
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct delivery_key);
	__type(value, __u8);
} agent_delivery SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); // a socket fd on update (aya checks a 4-byte value)
} inbound_listener SEC(".maps");

static __always_inline int try_steer_inbound(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	if (ctx->local_port == hbone_port)
		return SK_PASS;
	if (ctx->family == 2 /* AF_INET */) {
		if (ctx->remote_ip4 == ctx->local_ip4)
			return SK_PASS;
		if (probe_source_ip4 != 0 && ctx->remote_ip4 == probe_source_ip4)
			return SK_PASS;
		struct delivery_key delivery = {
			.ip4 = ctx->remote_ip4,
			.port = (__u16)ctx->remote_port,
		};
		if (bpf_map_lookup_elem(&agent_delivery, &delivery))
			return SK_PASS;
	}

	__u32 key = INBOUND_LISTENER_KEY;
	struct bpf_sock *sk = bpf_map_lookup_elem(&inbound_listener, &key);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

SEC("sk_lookup")
int zt_inbound(struct bpf_sk_lookup *ctx)
{
	return try_steer_inbound(ctx);
}

// No GPL-only helper is used, so the project licence can be declared as is.
char LICENSE[] SEC("license") = "Apache-2.0";
