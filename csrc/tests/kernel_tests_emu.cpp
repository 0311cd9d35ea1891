// arpg_kernel_emu_tests: kernel_tests.cu on the CPU through the SIMT emulator (no GPU needed).
#include "simt_emulator.h"

#include "kernel_tests.cu"
