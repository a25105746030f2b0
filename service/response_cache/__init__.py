"""The exact response cache: an answer to the same params, from the same partner (or a partner
it shares with), served again without calling Claude.

- `key.py`: which params make the key, and whose entries a partner reads;
- `entry.py`: what is stored and its bytes (compressed when it pays);
- `store.py`: where: Redis (bounded in bytes across replicas, by one Lua script) or an
  in-process LRU;
- `cache.py`: the front the pipeline calls (`lookup`, `store`), with metrics and the shared
  Redis health.
"""
