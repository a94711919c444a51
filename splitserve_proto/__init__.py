"""Protocol buffers for splitserve and their generated Python modules."""
