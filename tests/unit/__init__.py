"""Tests of one part at a time, in this process: no daemon, no socket of a process they start."""
