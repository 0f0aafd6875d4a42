"""Installation refuses 32-bit Pythons in one sentence, before pip looks for Numba.

Numba and llvmlite publish no wheels for 32-bit ARM (32-bit Raspberry Pi OS) nor any other 32-bit
Linux, so pip would go on to build llvmlite from source and fail minutes later in a compiler error.
No environment marker can say this: on a Raspberry Pi 4 or 5, 32-bit Raspberry Pi OS runs a 64-bit
kernel, so ``platform_machine`` is 'aarch64' while Python and pip are 32-bit (armv7l wheels).  pip
runs this file to get the build requirements of the project, before it resolves any dependency.
Everything else is in pyproject.toml.
"""

import struct
import sys

if struct.calcsize("P") * 8 < 64:
    sys.exit("edgellama needs a 64-bit Python: Numba and llvmlite publish no 32-bit wheels (32-bit Raspberry Pi OS "
             "included); on a Raspberry Pi, install Raspberry Pi OS (64-bit) and try again.")

from setuptools import setup  # noqa: E402

setup()
