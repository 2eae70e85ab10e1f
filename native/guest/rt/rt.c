/* Guest runtime C part: main, fail/print, and the libc bits gcc may call. */
#include "rt.h"

u64 vlab_strlen(const char *s)
{
    u64 n = 0;

    while (s[n])
        n++;
    return n;
}

void vlab_fail(u64 code, const char *msg)
{
    for (;;)
        ucall(UCALL_FAIL, code, (u64)msg, vlab_strlen(msg), 0);
}

void vlab_print(const char *msg)
{
    ucall(UCALL_PRINT, 0, (u64)msg, vlab_strlen(msg), 0);
}

void *memset(void *d, int c, u64 n)
{
    u8 *p = d;

    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    u8 *p = d;
    const u8 *q = s;

    while (n--)
        *p++ = *q++;
    return d;
}

void vlab_rt_main(u64 id, volatile u64 *params)
{
    if (params[P_MAGIC] != 0x564c4142504152ULL)   /* "VLABPAR" */
        vlab_fail(1, "parameter page magic missing");
    payload_main(id);
}
