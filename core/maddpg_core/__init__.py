"""What every layer of maddpg-citylearn shares: the tensor contract (``layout``), the error hierarchy (``errors``) and
files written so that nobody reads half of one (``files``). Imports nothing but numpy and the standard library."""
