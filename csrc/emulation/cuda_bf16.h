// Shadows the CUDA header in the CPU emulation build.
#pragma once
#include "cuda_emulation.h"
