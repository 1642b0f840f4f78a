/* An intrusive, circular doubly-linked list (the shape of h2o_linklist_t and
 * the kernel's list_head): a struct list head is its own sentinel, nodes are
 * embedded in their owners and recovered with LIST_ENTRY. Unlinking is O(1)
 * and leaves the node unlinked (safe to unlink twice). */
#ifndef LIST_H
#define LIST_H

#include <stdbool.h>
#include <stddef.h>

struct list {
    struct list *next, *prev;
};

#define LIST_ENTRY(node, type, member) ((type *)((char *)(node) - offsetof(type, member)))

/* Walks head; n may be unlinked (and freed) in the body. */
#define LIST_FOREACH_SAFE(n, tmp, head)                                                            \
    for ((n) = (head)->next, (tmp) = (n)->next; (n) != (head); (n) = (tmp), (tmp) = (n)->next)

static inline void list_init(struct list *l)
{
    l->next = l->prev = l;
}

static inline bool list_is_empty(const struct list *head)
{
    return head->next == head;
}

/* A node that list_init()ed or list_unlink()ed is not linked. */
static inline bool list_is_linked(const struct list *node)
{
    return node->next != node && node->next != NULL;
}

static inline void list_insert_before(struct list *pos, struct list *node)
{
    node->prev = pos->prev;
    node->next = pos;
    pos->prev->next = node;
    pos->prev = node;
}

static inline void list_insert_tail(struct list *head, struct list *node)
{
    list_insert_before(head, node);
}

static inline void list_insert_head(struct list *head, struct list *node)
{
    list_insert_before(head->next, node);
}

static inline void list_unlink(struct list *node)
{
    if (!list_is_linked(node))
        return;
    node->prev->next = node->next;
    node->next->prev = node->prev;
    list_init(node);
}

static inline size_t list_count(const struct list *head)
{
    size_t n = 0;

    for (const struct list *p = head->next; p != head; p = p->next)
        n++;
    return n;
}

#endif
