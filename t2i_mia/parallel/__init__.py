"""t2i_mia.parallel"""
