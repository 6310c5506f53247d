#ifndef KEYHOLE_CNETFILTERQUEUE_SHIM_H
#define KEYHOLE_CNETFILTERQUEUE_SHIM_H

#include <stdint.h>
#include <stddef.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <libmnl/libmnl.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#endif
