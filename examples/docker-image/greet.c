#include <stdio.h>

int main(void) {
    puts("hello from a scratch image, built by slate in a fresh VM");
    return 0;
}
