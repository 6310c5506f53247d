#ifndef KEYHOLE_FUZZER_DRIVER_H
#define KEYHOLE_FUZZER_DRIVER_H
#include <stddef.h>
#include <stdint.h>

/// libFuzzer's driver, for an executable that brings its own main (SwiftPM names the
/// entry point <Target>_main and aliases main to it, so libFuzzer's main cannot be used).
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
#endif
