# The helpers every src/<module>/CMakeLists.txt calls, shared by the main
# build (src/CMakeLists.txt) and the fuzz build (fuzz/CMakeLists.txt), which
# reads the same module files with its own compiler and sanitizer flags.
#
# Set before including:
#   TESSERA_SOURCE_ROOT      the repository root (include/, proto/)
#   TESSERA_MODULE_INSTALL   ON: versioned libraries with install rules and
#                            the TESSERA_MODULES list (the main build); OFF:
#                            plain libraries of BUILD_SHARED_LIBS's kind
#   TESSERA_WARNINGS         the warning flags for Tessera's own sources

# Internal helper: a Tessera module library.
#   tessera_add_module(NAME core SOURCES ... PUBLIC_DEPS ... PRIVATE_DEPS ...)
function(tessera_add_module)
  cmake_parse_arguments(M "" "NAME" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  set(target tessera_${M_NAME})
  add_library(${target} ${M_SOURCES})
  add_library(tessera::${M_NAME} ALIAS ${target})
  target_include_directories(${target} PUBLIC
    $<BUILD_INTERFACE:${TESSERA_SOURCE_ROOT}/include>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  # Private dependencies first: their include directories then come before
  # LibTorch's, which bundles its own (newer) fmt that spdlog must not see.
  target_link_libraries(${target} PRIVATE ${M_PRIVATE_DEPS} PUBLIC ${M_PUBLIC_DEPS})
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${TESSERA_WARNINGS}>)
  if(TESSERA_MODULE_INSTALL)
    set_target_properties(${target} PROPERTIES EXPORT_NAME ${M_NAME} OUTPUT_NAME tessera_${M_NAME}
      VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR})
    install(TARGETS ${target} EXPORT TesseraTargets
      LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
      ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
      RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
    set_property(GLOBAL APPEND PROPERTY TESSERA_MODULES tessera::${M_NAME})
  endif()
endfunction()

# Internal helper: C++ and gRPC code generated from a module's protos.
#   tessera_add_protos(TARGET tessera_rlhf PROTOS tessera/rlhf/worker [INSTALL])
# The generated headers are included as "tessera/<module>/<name>.pb.h".
function(tessera_add_protos)
  cmake_parse_arguments(P "INSTALL" "TARGET" "PROTOS" ${ARGN})
  set(proto_dir ${TESSERA_SOURCE_ROOT}/proto)
  set(gen ${PROJECT_BINARY_DIR}/generated)
  set(sources)
  foreach(proto ${P_PROTOS})
    set(out ${gen}/${proto}.pb.cc ${gen}/${proto}.pb.h ${gen}/${proto}.grpc.pb.cc ${gen}/${proto}.grpc.pb.h)
    add_custom_command(OUTPUT ${out}
      COMMAND ${CMAKE_COMMAND} -E make_directory ${gen}
      COMMAND protobuf::protoc --proto_path=${proto_dir} --cpp_out=${gen} --grpc_out=${gen}
              --plugin=protoc-gen-grpc=$<TARGET_FILE:gRPC::grpc_cpp_plugin> ${proto_dir}/${proto}.proto
      DEPENDS ${proto_dir}/${proto}.proto
      COMMENT "protoc ${proto}.proto")
    list(APPEND sources ${gen}/${proto}.pb.cc ${gen}/${proto}.grpc.pb.cc)
    if(P_INSTALL AND TESSERA_MODULE_INSTALL)
      get_filename_component(sub ${proto} DIRECTORY)
      install(FILES ${gen}/${proto}.pb.h ${gen}/${proto}.grpc.pb.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/${sub})
    endif()
  endforeach()
  set_source_files_properties(${sources} PROPERTIES COMPILE_OPTIONS "-w" SKIP_PRECOMPILE_HEADERS ON)
  target_sources(${P_TARGET} PRIVATE ${sources})
  target_include_directories(${P_TARGET} PUBLIC $<BUILD_INTERFACE:${gen}>)
endfunction()

