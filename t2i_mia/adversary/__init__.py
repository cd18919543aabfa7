"""t2i_mia.adversary"""
