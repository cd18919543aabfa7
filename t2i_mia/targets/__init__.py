"""t2i_mia.targets"""
