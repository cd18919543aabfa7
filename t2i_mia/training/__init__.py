"""t2i_mia.training"""
