// Emulation stand-in for the CUDA toolkit header of this name (see ../cuda_emulation.h).
#pragma once
#include "../cuda_emulation.h"
