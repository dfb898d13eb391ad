"""The pure scheduler core: no I/O, no clocks. Time is always an argument."""
