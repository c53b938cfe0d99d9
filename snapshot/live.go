package snapshot

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultPageSize is how many keys one range read returns.
const DefaultPageSize = 1000

type liveSource struct {
	kv       clientv3.KV
	prefix   string
	pageSize int64
	rev      int64
	count    int
}

// OpenEtcd reads the keys under prefix from a live etcd with paginated
// range reads, all at one revision (the latest when OpenEtcd is called) so
// the scan is a consistent view. The caller owns and closes client.
func OpenEtcd(ctx context.Context, kv clientv3.KV, prefix string, pageSize int) (Source, error) {
	if prefix == "" {
		return nil, fmt.Errorf("etcd scan: empty prefix")
	}
	if pageSize <= 0 {
		pageSize = DefaultPageSize
	}
	resp, err := kv.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return nil, fmt.Errorf("etcd: count keys under %q: %w", prefix, err)
	}
	return &liveSource{kv: kv, prefix: prefix, pageSize: int64(pageSize), rev: resp.Header.Revision, count: int(resp.Count)}, nil
}

func (s *liveSource) Len() int { return s.count }

func (s *liveSource) Each(ctx context.Context, fn func(key, value []byte) error) error {
	end := clientv3.GetPrefixRangeEnd(s.prefix)
	key := s.prefix
	for {
		resp, err := s.kv.Get(ctx, key, clientv3.WithRange(end), clientv3.WithLimit(s.pageSize),
			clientv3.WithRev(s.rev), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return fmt.Errorf("etcd: range read from %q at revision %d: %w", key, s.rev, err)
		}
		for _, kv := range resp.Kvs {
			if err := fn(kv.Key, kv.Value); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func (s *liveSource) Close() error { return nil }
