/* tunnel-agent entry point (placeholder until the gateway lands). */
#include <stdio.h>
#include <string.h>

#include "tg_config.h"

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("tunnel-agent %s\n", TG_VERSION);
        return 0;
    }
    fprintf(stderr, "tunnel-agent: not implemented yet\n");
    return 1;
}
