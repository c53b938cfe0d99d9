package cluster

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	kmsv2api "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kubekms/kubekms/hierarchy"
)

// Stored is one raw etcd value as kube-apiserver wrote it.
type Stored struct {
	Key    string
	Raw    []byte
	Format string                    // "kms-v2:<name>", "kms-v1:<name>", or "plain"
	Object *kmsv2api.EncryptedObject // set for kms-v2 values
}

// KeyID is the KMS v2 key_id of the value, or "".
func (s Stored) KeyID() string { return s.Object.GetKeyID() }

// SeedID identifies the DEK seed the value was encrypted with: what the
// apiserver's decrypt cache is keyed by (encrypted seed, key_id, annotations).
func (s Stored) SeedID() string {
	if s.Object == nil {
		return ""
	}
	return string(s.Object.GetEncryptedDEKSource()) + "\x00" + s.Object.GetKeyID() + "\x00" + s.AnnotationsID()
}

// LocalKEKID identifies kubekms's wrapped local KEK that sealed the value's
// seed (inside the encrypted seed, or in the annotation of format 2); "" for
// a value kubekms did not seal.
func (s Stored) LocalKEKID() string {
	if s.Object == nil {
		return ""
	}
	return string(hierarchy.Sealed{Ciphertext: s.Object.GetEncryptedDEKSource(), Annotations: s.Object.GetAnnotations()}.LocalKEK())
}

// AnnotationsID is a canonical form of the value's annotations.
func (s Stored) AnnotationsID() string {
	ann := s.Object.GetAnnotations()
	keys := make([]string, 0, len(ann))
	for k := range ann {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%x;", k, ann[k])
	}
	return b.String()
}

// ReadStored reads every value under an etcd key prefix, e.g.
// "/registry/secrets/", in pages, and decodes the envelope of each.
func (e *Etcd) ReadStored(ctx context.Context, prefix string) ([]Stored, error) {
	var out []Stored
	key := prefix
	end := clientv3.GetPrefixRangeEnd(prefix)
	for {
		resp, err := e.Client.Get(ctx, key, clientv3.WithRange(end), clientv3.WithLimit(1000),
			clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return nil, fmt.Errorf("etcd get %s: %w", prefix, err)
		}
		for _, kv := range resp.Kvs {
			s, err := decodeStored(string(kv.Key), kv.Value)
			if err != nil {
				return nil, err
			}
			out = append(out, s)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

const (
	kmsV2Prefix = "k8s:enc:kms:v2:"
	kmsV1Prefix = "k8s:enc:kms:v1:"
)

func decodeStored(key string, raw []byte) (Stored, error) {
	s := Stored{Key: key, Raw: raw, Format: "plain"}
	switch {
	case bytes.HasPrefix(raw, []byte(kmsV2Prefix)):
		rest := raw[len(kmsV2Prefix):]
		i := bytes.IndexByte(rest, ':')
		if i < 0 {
			return s, fmt.Errorf("%s: kms v2 value without provider name", key)
		}
		s.Format = "kms-v2:" + string(rest[:i])
		obj := &kmsv2api.EncryptedObject{}
		if err := proto.Unmarshal(rest[i+1:], obj); err != nil {
			return s, fmt.Errorf("%s: decode EncryptedObject: %w", key, err)
		}
		s.Object = obj
	case bytes.HasPrefix(raw, []byte(kmsV1Prefix)):
		rest := raw[len(kmsV1Prefix):]
		i := bytes.IndexByte(rest, ':')
		if i < 0 {
			return s, fmt.Errorf("%s: kms v1 value without provider name", key)
		}
		s.Format = "kms-v1:" + string(rest[:i])
	}
	return s, nil
}

// CountBy counts values by a property.
func CountBy(values []Stored, by func(Stored) string) map[string]int {
	m := map[string]int{}
	for _, v := range values {
		m[by(v)]++
	}
	return m
}
