package decrypt

import (
	"bytes"
	"errors"
	"fmt"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

// ErrUndecodable: the plaintext is not an object this tool can turn into a
// manifest (a protobuf kind outside client-go's scheme, or neither
// Kubernetes protobuf nor JSON).
var ErrUndecodable = errors.New("cannot decode object")

// protobufMagic starts every value kube-apiserver stores in its protobuf encoding.
var protobufMagic = []byte("k8s\x00")

// Converter turns stored plaintext into a YAML manifest.
type Converter struct {
	proto *protobuf.Serializer
	yaml  *json.Serializer
}

// NewConverter uses client-go's scheme (all built-in kinds).
func NewConverter() *Converter {
	return &Converter{
		proto: protobuf.NewSerializer(scheme.Scheme, scheme.Scheme),
		yaml:  json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme, json.SerializerOptions{Yaml: true}),
	}
}

// ToYAML converts a stored object to YAML with apiVersion and kind set:
// Kubernetes protobuf ("k8s\x00...") through the scheme, JSON (custom
// resources) as it is.
func (c *Converter) ToYAML(plaintext []byte) ([]byte, error) {
	if bytes.HasPrefix(plaintext, protobufMagic) {
		obj, gvk, err := c.proto.Decode(plaintext, nil, nil)
		if err != nil {
			if runtime.IsNotRegisteredError(err) {
				return nil, fmt.Errorf("%w: protobuf kind not in client-go's scheme: %v", ErrUndecodable, err)
			}
			return nil, fmt.Errorf("%w: protobuf: %v", ErrUndecodable, err)
		}
		obj.GetObjectKind().SetGroupVersionKind(*gvk)
		var out bytes.Buffer
		if err := c.yaml.Encode(obj, &out); err != nil {
			return nil, fmt.Errorf("%w: encode %s as YAML: %v", ErrUndecodable, gvk.Kind, err)
		}
		return out.Bytes(), nil
	}
	trimmed := bytes.TrimSpace(plaintext)
	if len(trimmed) > 0 && trimmed[0] == '{' {
		out, err := yaml.JSONToYAML(trimmed)
		if err != nil {
			return nil, fmt.Errorf("%w: JSON: %v", ErrUndecodable, err)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w: neither Kubernetes protobuf nor JSON", ErrUndecodable)
}
