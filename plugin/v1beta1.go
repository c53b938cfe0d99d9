//lint:file-ignore SA1019 KMS v1beta1 is deprecated upstream; kubekms serves it on purpose so clusters can migrate from v1 to v2.

package plugin

import (
	"context"
	"encoding/binary"

	kmsv1 "k8s.io/kms/apis/v1beta1"

	"github.com/kubekms/kubekms/hierarchy"
)

// V1 implements the deprecated v1beta1.KeyManagementService over the same
// hierarchy, so a cluster can move from KMS v1 to v2 with one plugin. v1 has
// no key_id or annotations on the wire, so its ciphertext carries them:
//
//	0x02 || uvarint(len key_id) || key_id || uvarint(len annotation) || annotation || seal
//
// The annotation is empty for a format-3 seal, which holds its local KEK.
type V1 struct {
	kmsv1.UnimplementedKeyManagementServiceServer
	h        *hierarchy.Hierarchy
	opts     Options
	enc, dec *observer
}

const v1Framing byte = 0x02

// NewV1 returns the v1beta1 service over h.
func NewV1(h *hierarchy.Hierarchy, opts Options) *V1 {
	opts.defaults()
	return &V1{h: h, opts: opts, enc: newObserver(opts, "v1beta1", "Encrypt"), dec: newObserver(opts, "v1beta1", "Decrypt")}
}

// Version answers the apiserver's v1 version check.
func (s *V1) Version(context.Context, *kmsv1.VersionRequest) (*kmsv1.VersionResponse, error) {
	return &kmsv1.VersionResponse{Version: "v1beta1", RuntimeName: "kubekms", RuntimeVersion: s.opts.Version}, nil
}

// Encrypt seals a v1 DEK.
func (s *V1) Encrypt(ctx context.Context, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	ctx, c := s.enc.begin(ctx, "")
	sealed, err := s.h.Encrypt(ctx, req.GetPlain())
	if err != nil {
		return nil, c.end(err)
	}
	c.keyID = sealed.KeyID
	ann := sealed.Annotations[hierarchy.AnnotationKey]
	out := make([]byte, 0, 1+2*binary.MaxVarintLen64+len(sealed.KeyID)+len(ann)+len(sealed.Ciphertext))
	out = append(out, v1Framing)
	out = binary.AppendUvarint(out, uint64(len(sealed.KeyID)))
	out = append(out, sealed.KeyID...)
	out = binary.AppendUvarint(out, uint64(len(ann)))
	out = append(out, ann...)
	out = append(out, sealed.Ciphertext...)
	return &kmsv1.EncryptResponse{Cipher: out}, c.end(nil)
}

// Decrypt opens a v1 ciphertext.
func (s *V1) Decrypt(ctx context.Context, req *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	ctx, c := s.dec.begin(ctx, "")
	keyID, ann, sealed, err := parseV1(req.GetCipher())
	if err != nil {
		return nil, c.end(err)
	}
	c.keyID = keyID
	var anns map[string][]byte
	if len(ann) > 0 {
		anns = map[string][]byte{hierarchy.AnnotationKey: ann}
	}
	plain, err := s.h.Decrypt(ctx, keyID, sealed, anns)
	if err != nil {
		return nil, c.end(err)
	}
	return &kmsv1.DecryptResponse{Plain: plain}, c.end(nil)
}

func parseV1(b []byte) (keyID string, ann, sealed []byte, err error) {
	if len(b) == 0 {
		return "", nil, nil, invalid("cipher is empty")
	}
	if b[0] != v1Framing {
		return "", nil, nil, invalid("cipher has unknown v1 framing version %d (want %d)", b[0], v1Framing)
	}
	rest := b[1:]
	field := func(name string) ([]byte, error) {
		n, k := binary.Uvarint(rest)
		if k <= 0 || n > uint64(len(rest)-k) {
			return nil, invalid("cipher is truncated in its %s", name)
		}
		v := rest[k : k+int(n)]
		rest = rest[k+int(n):]
		return v, nil
	}
	id, err := field("key_id")
	if err != nil {
		return "", nil, nil, err
	}
	ann, err = field("annotation")
	if err != nil {
		return "", nil, nil, err
	}
	return string(id), ann, rest, nil
}
