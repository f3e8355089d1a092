import os
import sys

# Tests import the flat root modules (model.py, moe_lora.py, ...) the way the scripts do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
