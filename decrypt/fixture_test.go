package decrypt_test

import (
	"context"
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
)

// kv is one etcd key and the value kube-apiserver would store there.
type kv struct{ key, value string }

// fixture is a small cluster's etcd contents written by the real apiserver
// transformer: secrets under two key_ids (a rotation between them), plain
// configmaps, a plain custom resource (JSON) and one tampered secret.
type fixture struct {
	plugin   *envelopetest.Plugin
	endpoint string
	kvs      []kv
	tampered string // key of the corrupted value
}

const (
	fixtureOldSecrets = 6 // under key-1
	fixtureNewSecrets = 4 // under key-2, plus the tampered one
	fixtureConfigMaps = 3
)

func protoEncode(t testing.TB, obj runtime.Object) []byte {
	t.Helper()
	codec := scheme.Codecs.EncoderForVersion(protobuf.NewSerializer(scheme.Scheme, scheme.Scheme), corev1.SchemeGroupVersion)
	b, err := runtime.Encode(codec, obj)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func secret(t testing.TB, ns, name string) []byte {
	return protoEncode(t, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name)},
		Data:       map[string][]byte{"password": []byte("pw-" + name)},
		Type:       corev1.SecretTypeOpaque,
	})
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{plugin: envelopetest.NewPlugin()}
	f.endpoint = envelopetest.Serve(t, f.plugin)
	ctx := context.Background()
	store := func(tr value.Transformer, key string, plain []byte) string {
		out, err := tr.TransformToStorage(ctx, plain, value.DefaultContext(key))
		if err != nil {
			t.Fatalf("apiserver TransformToStorage(%s): %v", key, err)
		}
		return string(out)
	}
	tr := envelopetest.Apiserver(t, f.endpoint, "kubekms", envelopetest.Secrets)
	for i := range fixtureOldSecrets {
		key := fmt.Sprintf("/registry/secrets/team-a/old-%d", i)
		f.kvs = append(f.kvs, kv{key, store(tr, key, secret(t, "team-a", fmt.Sprintf("old-%d", i)))})
	}
	f.plugin.Rotate()
	tr = envelopetest.Apiserver(t, f.endpoint, "kubekms", envelopetest.Secrets) // a restarted apiserver
	for i := range fixtureNewSecrets {
		key := fmt.Sprintf("/registry/secrets/team-b/new-%d", i)
		f.kvs = append(f.kvs, kv{key, store(tr, key, secret(t, "team-b", fmt.Sprintf("new-%d", i)))})
	}
	f.tampered = "/registry/secrets/team-b/tampered"
	// Flip one bit of the GCM ciphertext; the envelope stays well-formed.
	h, obj, err := envelope.Decode([]byte(store(tr, f.tampered, secret(t, "team-b", "tampered"))))
	if err != nil {
		t.Fatal(err)
	}
	obj.EncryptedData[len(obj.EncryptedData)-20] ^= 0x40
	bad, err := envelope.Encode(h.Provider, obj)
	if err != nil {
		t.Fatal(err)
	}
	f.kvs = append(f.kvs, kv{f.tampered, string(bad)})
	for i := range fixtureConfigMaps {
		name := fmt.Sprintf("cm-%d", i)
		f.kvs = append(f.kvs, kv{"/registry/configmaps/team-a/" + name, string(protoEncode(t, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "team-a"},
			Data:       map[string]string{"k": "v"},
		}))})
	}
	f.kvs = append(f.kvs, kv{"/registry/example.com/widgets/team-a/w1",
		`{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w1","namespace":"team-a"},"spec":{"size":3}}`})
	return f
}
