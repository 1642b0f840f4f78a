/* The inspector's page (agent/ag_insp_page.html), embedded at build time:
 * agent/embed_page.py writes ag_insp_page.c from it (agent/meson.build). */
#ifndef AG_INSP_PAGE_H
#define AG_INSP_PAGE_H

#include <stddef.h>

extern const char ag_insp_page[];
extern const size_t ag_insp_page_len;

#endif
