/*
 * fastlogits_sample.h: seeded sampling (counter-based random numbers, Gumbel-max and the top-k, top-p,
 * min-p filters). Included by fastlogits.h; never include it directly.
 */
#ifndef FASTLOGITS_H
#error "fastlogits_sample.h is included by fastlogits.h only"
#endif
