"""The Ray pipeline: driver, Ray Data snapshot/tokenize jobs, Ray Train segment trainers (only package importing Ray)."""
