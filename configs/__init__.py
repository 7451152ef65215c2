"""The YAML configs shipped with the package as `retinanet.configs` (see retinanet.config.find_config_file)."""
