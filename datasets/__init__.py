"""Dataset layer: UniAD JSON-lines manifests and the embedded synthetic MVTec-style demo data.

Kept free of torch imports so the manifest and generator tools work before the heavy stack loads.
"""
