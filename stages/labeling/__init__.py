"""Label sources (a registry, one file each), confident learning and the labels artifact format (store)."""
